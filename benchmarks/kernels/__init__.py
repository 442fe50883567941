"""Kernel benchmarks (GPU only; they say so and measure nothing on a machine without one)."""
