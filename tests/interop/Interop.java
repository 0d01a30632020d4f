// A Java service on the bus's topics, for tests/test_interop.py: the official client with Pulsar's schemas.
//
//   java -cp <classpath> Interop consume-json <url> <token> <topic> <subscription> <count>
//   java -cp <classpath> Interop produce-json <url> <token> <topic> <count>
//   java -cp <classpath> Interop produce-avro <url> <token> <topic> <count>
//   java -cp <classpath> Interop produce-batched <url> <token> <topic> <count> default|key-based
//   java -cp <classpath> Interop consume-bytes <url> <token> <topic> <subscription> <count>
//   java -cp <classpath> Interop produce-chunked <url> <token> <topic> <count> <bytes>
//   java -cp <classpath> Interop consume-keyshared <url> <token> <topic> <subscription> <idle-seconds>
//   java -cp <classpath> Interop hold-shared <url> <token> <topic> <subscription>
//
// consume-json reads <count> messages with Schema.JSON(Reading.class) from the earliest and prints each as
// one JSON line after "ROW " (the client logs on stdout too): key, properties, event time, the decoded fields.
// produce-json sends <count> Readings keyed "sensor-<i % 3>" with a property and an event time, then prints
// "ROW sent <count>"; produce-avro the same with Schema.AVRO(Reading.class); produce-batched sends <count>
// byte payloads "<i>" keyed "k<i % 4>" at once (sendAsync, then flush) with the batcher named; consume-bytes
// reads as consume-json does with Schema.BYTES (a topic without a schema: a dead-letter topic), the payload as text; produce-chunked sends <count> JSON objects {"seq": i, "pad": ...} of about <bytes>
// bytes each, chunked at 1,000 bytes (batching off, as chunking needs), and prints each one's id as the producer
// returned it: "ROW {"seq": i, "id": <MessageId.toString()>}"; consume-keyshared joins the subscription as
// Key_Shared, prints "ROW {"ready": true}", then prints each message as "ROW {"key": ..., "payload": ...}" (and
// acknowledges it) until none came for <idle-seconds>; hold-shared holds the subscription as Shared, prints
// "ROW {"ready": true}" and keeps it until its stdin closes. Any failure: its text on stderr and exit 1.
import java.util.Map;
import java.util.concurrent.TimeUnit;

import com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.pulsar.client.api.AuthenticationFactory;
import org.apache.pulsar.client.api.BatcherBuilder;
import org.apache.pulsar.client.api.Consumer;
import org.apache.pulsar.client.api.Message;
import org.apache.pulsar.client.api.Producer;
import org.apache.pulsar.client.api.PulsarClient;
import org.apache.pulsar.client.api.Schema;
import org.apache.pulsar.client.api.SubscriptionInitialPosition;
import org.apache.pulsar.client.api.SubscriptionType;

public final class Interop {
    /** The payload both sides share; a Java team writes it as a plain class with public fields. */
    public static final class Reading {
        public String sensor;
        public double value;
        public long seq;
        public String note;
    }

    public static void main(String[] args) throws Exception {
        String mode = args[0];
        try (PulsarClient client = client(args[1], args[2])) {
            if (mode.equals("consume-json")) {
                consume(client, args[3], args[4], Integer.parseInt(args[5]));
            } else if (mode.equals("consume-bytes")) {
                consumeBytes(client, args[3], args[4], Integer.parseInt(args[5]));
            } else if (mode.equals("produce-json")) {
                produce(client, Schema.JSON(Reading.class), args[3], Integer.parseInt(args[4]));
            } else if (mode.equals("produce-batched")) {
                produceBatched(client, args[3], Integer.parseInt(args[4]), args[5].equals("key-based"));
            } else if (mode.equals("produce-chunked")) {
                produceChunked(client, args[3], Integer.parseInt(args[4]), Integer.parseInt(args[5]));
            } else if (mode.equals("consume-keyshared")) {
                consumeKeyShared(client, args[3], args[4], Integer.parseInt(args[5]));
            } else if (mode.equals("hold-shared")) {
                holdShared(client, args[3], args[4]);
            } else if (mode.equals("produce-avro")) {
                produce(client, Schema.AVRO(Reading.class), args[3], Integer.parseInt(args[4]));
            } else {
                throw new IllegalArgumentException("unknown mode " + mode);
            }
        } catch (Exception e) {
            System.err.println(e.getClass().getSimpleName() + ": " + e.getMessage());
            System.exit(1);
        }
    }

    private static PulsarClient client(String url, String token) throws Exception {
        var builder = PulsarClient.builder().serviceUrl(url).operationTimeout(30, TimeUnit.SECONDS);
        if (!token.isEmpty()) {
            builder.authentication(AuthenticationFactory.token(token));
        }
        return builder.build();
    }

    private static void consume(PulsarClient client, String topic, String subscription, int count) throws Exception {
        ObjectMapper json = new ObjectMapper();
        try (Consumer<Reading> consumer = client.newConsumer(Schema.JSON(Reading.class)).topic(topic)
                .subscriptionName(subscription).subscriptionInitialPosition(SubscriptionInitialPosition.Earliest)
                .subscribe()) {
            for (int i = 0; i < count; i++) {
                Message<Reading> message = consumer.receive(30, TimeUnit.SECONDS);
                if (message == null) {
                    throw new IllegalStateException("no message " + (i + 1) + " of " + count + " within 30 s");
                }
                Reading r = message.getValue();
                System.out.println("ROW " + json.writeValueAsString(Map.of(
                        "key", message.hasKey() ? message.getKey() : "", "properties", message.getProperties(),
                        "event_time", message.getEventTime(), "sensor", String.valueOf(r.sensor), "value", r.value,
                        "seq", r.seq, "note", String.valueOf(r.note))));
                consumer.acknowledge(message);
            }
        }
    }

    private static void consumeBytes(PulsarClient client, String topic, String subscription, int count)
            throws Exception {
        ObjectMapper json = new ObjectMapper();
        try (Consumer<byte[]> consumer = client.newConsumer(Schema.BYTES).topic(topic)
                .subscriptionName(subscription).subscriptionInitialPosition(SubscriptionInitialPosition.Earliest)
                .subscribe()) {
            for (int i = 0; i < count; i++) {
                Message<byte[]> message = consumer.receive(30, TimeUnit.SECONDS);
                if (message == null) {
                    throw new IllegalStateException("no message " + (i + 1) + " of " + count + " within 30 s");
                }
                System.out.println("ROW " + json.writeValueAsString(Map.of(
                        "key", message.hasKey() ? message.getKey() : "", "properties", message.getProperties(),
                        "event_time", message.getEventTime(), "payload", new String(message.getValue(), "UTF-8"))));
                consumer.acknowledge(message);
            }
        }
    }

    private static void produceBatched(PulsarClient client, String topic, int count, boolean keyBased)
            throws Exception {
        var builder = client.newProducer().topic(topic).batchingMaxPublishDelay(50, TimeUnit.MILLISECONDS);
        if (keyBased) {
            builder.batcherBuilder(BatcherBuilder.KEY_BASED);
        }
        try (Producer<byte[]> producer = builder.create()) {
            for (int i = 0; i < count; i++) {
                producer.newMessage().key("k" + (i % 4)).value(("\"" + i + "\"").getBytes()).sendAsync();
            }
            producer.flush();
        }
        System.out.println("ROW sent " + count);
    }

    private static void consumeKeyShared(PulsarClient client, String topic, String subscription, int idleSeconds)
            throws Exception {
        ObjectMapper json = new ObjectMapper();
        try (Consumer<byte[]> consumer = client.newConsumer(Schema.BYTES).topic(topic).subscriptionName(subscription)
                .subscriptionType(SubscriptionType.Key_Shared).subscribe()) {
            System.out.println("ROW " + json.writeValueAsString(Map.of("ready", true)));
            System.out.flush();
            while (true) {
                Message<byte[]> message = consumer.receive(idleSeconds, TimeUnit.SECONDS);
                if (message == null) {
                    break;
                }
                System.out.println("ROW " + json.writeValueAsString(Map.of(
                        "key", message.getKey(), "payload", new String(message.getValue(), "UTF-8"))));
                consumer.acknowledge(message);
            }
        }
    }

    private static void holdShared(PulsarClient client, String topic, String subscription) throws Exception {
        try (Consumer<byte[]> consumer = client.newConsumer(Schema.BYTES).topic(topic).subscriptionName(subscription)
                .subscriptionType(SubscriptionType.Shared).receiverQueueSize(0).subscribe()) {
            System.out.println("ROW {\"ready\":true}");
            System.out.flush();
            while (System.in.read() != -1) {
                // held until the test closes stdin
            }
        }
    }

    private static void produceChunked(PulsarClient client, String topic, int count, int bytes) throws Exception {
        ObjectMapper json = new ObjectMapper();
        try (Producer<byte[]> producer = client.newProducer().topic(topic).enableBatching(false)
                .enableChunking(true).chunkMaxMessageSize(1000).create()) {
            for (int i = 0; i < count; i++) {
                byte[] payload = json.writeValueAsBytes(Map.of("seq", i, "pad", "x".repeat(bytes)));
                var id = producer.newMessage().key("k" + i).value(payload).send();
                System.out.println("ROW " + json.writeValueAsString(Map.of("seq", i, "id", id.toString())));
            }
        }
    }

    private static void produce(PulsarClient client, Schema<Reading> schema, String topic, int count)
            throws Exception {
        try (Producer<Reading> producer = client.newProducer(schema).topic(topic).create()) {
            for (int i = 0; i < count; i++) {
                Reading r = new Reading();
                r.sensor = "sensor-" + (i % 3);
                r.value = i * 1.5;
                r.seq = i;
                r.note = i % 2 == 0 ? null : "odd";
                producer.newMessage().key(r.sensor).value(r).property("origin", "java")
                        .eventTime(1_700_000_000_000L + i).send();
            }
        }
        System.out.println("ROW sent " + count);
    }
}
