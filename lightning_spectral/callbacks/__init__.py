"""Thin Lightning callbacks: "is it due?" -> capture -> functional -> report."""
