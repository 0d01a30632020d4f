"""The Pulsar adapter and the brokers it reaches: the one module touching pulsar-client, the embedded broker, connecting."""
