"""File formats: readers, writers and importers. Standard library only (no torch), so the feedback app can use them."""
