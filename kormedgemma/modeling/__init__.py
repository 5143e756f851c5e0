"""The models themselves: the base (built, from the Hub or from a GGUF file) and the Gemma 3 family
quirks, row-delta embeddings, the chunked causal-LM loss.
"""
