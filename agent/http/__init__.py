"""The OpenAI-compatible HTTP front door (FastAPI on uvicorn), on the same core as MQTT."""
