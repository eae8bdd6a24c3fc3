"""Stores: where dictionaries, analyses, logit attributions and interpretations are recorded."""
