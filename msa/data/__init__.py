"""Data sets as they are read: the MVSA reader, folds, text normalisation, generated demo data."""
