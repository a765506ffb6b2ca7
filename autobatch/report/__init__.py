"""What a person looks at: matplotlib and plotly figures, the PNG report, the dashboard."""
