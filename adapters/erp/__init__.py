"""ERP adapters (REST, SOAP, B2MML). The simulated ERP lives with the simulator for now."""
