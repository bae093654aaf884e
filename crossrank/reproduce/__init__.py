"""`python -m crossrank reproduce ROW`: one command per paper row (configs/reproduce/rows.yaml)."""
