"""Load-testing tools around Locust: the before/after experiment and its report."""
