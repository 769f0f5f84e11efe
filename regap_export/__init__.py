"""regap-export: fit ReGap's drift-correction directions and export corrected models."""
__version__ = "0.1.0"
