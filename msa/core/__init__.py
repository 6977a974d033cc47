"""The ground floor: configs, errors, compute, locks, run directories, progress. Imports nothing of msa above it."""
