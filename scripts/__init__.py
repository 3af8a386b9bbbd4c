"""Thin command lines: parse arguments, call a package."""
