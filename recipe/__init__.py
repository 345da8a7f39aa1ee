"""Your own continued pretraining as one job: a recipe file (recipe/schema.py) planned into typed steps
(recipe/plan.py), each rendered to its part's command line (recipe/argv.py) and run (recipe/runner.py),
ending in a report (recipe/report.py). `python -m recipe run recipe.yaml`."""
