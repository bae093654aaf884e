"""`python -m crossrank reproduce ROW` (crossrank/reproduce/cli.py): one command per paper row (configs/reproduce/rows.yaml)."""
