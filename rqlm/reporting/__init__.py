"""What a run writes for a person to read: the demo's report (`report`, `report_plots`) and training curves (`plots`)."""
