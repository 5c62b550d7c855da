"""Composer callbacks of darwinlm_foundry (installed as the subpackage ``darwinlm_foundry.callbacks``)."""
