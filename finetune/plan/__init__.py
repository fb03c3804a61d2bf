"""Predicting GPU memory before anything is downloaded: skeleton → estimate → plan."""
