"""`python -m dynamo_lite.doctor`: checks a host and the deployment it belongs to (docs/doctor.md)."""
