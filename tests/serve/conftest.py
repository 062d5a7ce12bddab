"""App tests: no telemetry from gradio / gradio_client (there is no internet, and tests should not phone home)."""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
