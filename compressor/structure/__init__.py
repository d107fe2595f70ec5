"""Structural compression: block importance scores, block / branch removal, block fusion, model surgery."""
