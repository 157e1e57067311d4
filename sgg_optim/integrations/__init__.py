"""Integrations with the ecosystem (bitsandbytes, Accelerate, Transformers, PEFT).

They import the core; the core never imports them.
"""
