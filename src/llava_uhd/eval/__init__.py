"""Evaluation: greedy answers to exactly checkable questions, scored per question kind (`synthetic_eval`), and
the accuracy tables runs report them in (`reporting`)."""
