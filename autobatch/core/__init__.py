"""Plain dataclasses and helpers that every stage uses: configs, budgets, windows, schedules, noise, the adaptive controller, progress. Imports no framework and no other stage."""
