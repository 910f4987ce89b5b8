"""Distillation: a frozen teacher, a student with per-strategy adapters, and the loss registry."""
