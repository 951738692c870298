"""The weight watermark: digits at secret positions of a weight, and the alignment that
undoes a pirate's permutation and rescaling before it is read; and the answer watermark, its
journal and the record store the extraction audit reads. Above models.
"""
