"""The poster's published numbers (COCO 2017 val box mAP), transcribed from PAPER.md "Results to rebuild".

Keys use the MLflow schema's values: `strategies` sorted and comma-joined, All2All = all four. A cell the
source prints inconsistently carries the note "*" (shown beside the number, explained under the table).
"""

ALL2ALL = "B2B,B2N,N2B,N2N"

# Table 1: (detector, method, strategies) -> (mAP, Δ over the student as printed, note)
TABLE1_PAIR = "ResNeXt101 → MobileV2C128"
TABLE1 = {
    ("fcos", "teacher", ""): (42.7, None, ""),
    ("fcos", "student", ""): (30.4, None, ""),
    ("fcos", "hint", "N2N"): (31.5, 1.1, "*"),  # printed "35.1" beside +1.1; 30.4 + 1.1 = 31.5
    ("fcos", "pad", "N2N"): (31.8, 1.4, ""),
    ("fcos", "nonlocal", "N2N"): (32.3, 1.9, "*"),  # printed "33.3" beside +1.9
    ("fcos", "di", "N2N"): (34.7, 4.3, ""),
    ("fcos", "dist2", ALL2ALL): (36.4, 6.0, ""),
    ("retinanet", "teacher", ""): (41.1, None, ""),
    ("retinanet", "student", ""): (31.0, None, ""),
    ("retinanet", "hint", "N2N"): (31.6, 0.6, ""),
    ("retinanet", "pad", "N2N"): (31.4, 0.4, ""),
    ("retinanet", "nonlocal", "N2N"): (31.9, 0.9, ""),
    ("retinanet", "di", "N2N"): (32.4, 1.4, ""),
    ("retinanet", "dist2", ALL2ALL): (32.5, 1.5, ""),
}

# Table 2: one strategy with DI, FCOS ResNeXt101 (42.7) -> ResNet50C128 (student 33.4).
TABLE2_PAIR = "ResNeXt101 → ResNet50C128 (FCOS)"
TABLE2_STUDENT = 33.4
TABLE2 = {"N2N": (38.3, 4.9), "B2B": (38.3, 4.9), "B2N": (38.0, 4.6), "N2B": (37.9, 4.5)}

# Table 3: number of strategies used together (same pair). The source repeats Table 2's row here, most likely a
# transcription error: shown "as transcribed".
TABLE3 = {1: 38.3, 2: 38.3, 3: 38.0, 4: 37.9}

NOTES = {"*": "inconsistent in the source (PAPER.md): the printed mAP disagrees with its printed Δ; "
              "the student's mAP + Δ is shown"}
