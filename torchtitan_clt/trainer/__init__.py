"""The trainer's parts: builders (``build``), one step (``step``), what follows the loop (``finish``)."""
