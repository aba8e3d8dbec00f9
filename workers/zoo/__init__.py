"""The zoo (bottom layer): builtin networks, the char-LM, entrypoint models and the
datasets. Pure torch; imports nothing else of workers but its foundation modules.
"""
