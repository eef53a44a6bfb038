"""Shipped model and hardware profiles (package data, installed as ztune.profiles_data)."""
