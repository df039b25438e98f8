"""How fastpeft plugs into other libraries' engines (``transformers.Trainer``: transformers_trainer.py)."""
