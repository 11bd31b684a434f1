"""Jinja templates of the Hugging Face Hub model cards (installed as ``st_bitembed.model_cards``)."""
