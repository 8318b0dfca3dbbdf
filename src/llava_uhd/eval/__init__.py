"""Evaluation helpers: greedy answers to exactly checkable questions, scored per question kind."""
