"""Scoring of trial lists, beside models/ and loss/: metrics (pair scores, EER, minDCF at
P_TARGETS), backends (each a class in BACKENDS), bootstrap (intervals over speakers),
calibration (scores to log-likelihood ratios), report (typed records, the table, the files) and
evaluation (the results of trial lists in one call). No module here imports the data loader."""
