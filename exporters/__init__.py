"""Artifact writers. Each reads the plan (never re-derives a decision) and writes into a given directory."""
