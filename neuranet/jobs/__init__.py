"""The compute market: project archives, host matching, job lifecycles and the sandbox jobs run in."""
