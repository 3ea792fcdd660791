"""clamnet"""
