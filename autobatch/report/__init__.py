"""What a person looks at: a study's plots (matplotlib for the PNG report, plotly for optuna-dashboard), the dashboard server, and the devices report."""
