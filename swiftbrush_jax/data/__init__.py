"""Prompt data: prompt files and datasets, the deterministic multi-host prompt stream, JourneyDB."""
