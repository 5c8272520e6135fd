"""What people see: tables, progress, plotly figures and static images."""
