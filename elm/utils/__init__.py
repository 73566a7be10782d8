"""Small shared helpers: atomic files, seeding, device/precision, run logging."""
