"""Language-model backends (registered through ``lmsae_register_language_models``)."""
