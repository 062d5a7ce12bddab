"""`tunelab doctor`: named checks for the failures that fine-tuning makes silently.

report.py  the result record (`Check`), the one runner (`run_checks`), the table and the JSON
before.py  before training, on the prepared data and the loaded LoRA model (`tunelab doctor CONFIG`, `tunelab train`)
after.py   after training or export, on the run folder (`tunelab doctor RUN`)
commands.py  the `tunelab doctor` command
"""
