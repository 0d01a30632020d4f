// A Go service on the bus's topics, for tests/test_interop.py: the official Go client with Pulsar's schemas.
//
// The same modes, arguments and output as ../Interop.java (go run . <mode> <url> <token> ...):
// consume-json, consume-bytes, produce-json, produce-avro, produce-batched default|key-based. Its messages carry the property
// origin=go. Any failure: its text on stderr and exit 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/apache/pulsar-client-go/pulsar"
	plog "github.com/apache/pulsar-client-go/pulsar/log"
	"github.com/sirupsen/logrus"
)

// readingDef is the definition a Go team writes for its struct: Java's Schema.JSON(Reading.class) registers the same.
const readingDef = `{"type":"record","name":"Reading","namespace":"Interop","fields":[
{"name":"sensor","type":["null","string"],"default":null},{"name":"value","type":"double"},
{"name":"seq","type":"long"},{"name":"note","type":["null","string"],"default":null}]}`

// Reading is the payload; a nil note is left out of the JSON, as Java's JSON schema leaves nulls out.
type Reading struct {
	Sensor string  `json:"sensor" avro:"sensor"`
	Value  float64 `json:"value" avro:"value"`
	Seq    int64   `json:"seq" avro:"seq"`
	Note   *string `json:"note,omitempty" avro:"note"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(args []string) error {
	mode, url, token := args[0], args[1], args[2]
	options := pulsar.ClientOptions{URL: url, OperationTimeout: 30 * time.Second, Logger: quiet()}
	if token != "" {
		options.Authentication = pulsar.NewAuthenticationToken(token)
	}
	client, err := pulsar.NewClient(options)
	if err != nil {
		return err
	}
	defer client.Close()
	count, _ := strconv.Atoi(args[len(args)-1])
	switch mode {
	case "consume-json":
		schema, err := pulsar.NewJSONSchemaWithValidation(readingDef, nil)
		if err != nil {
			return err
		}
		return consume(client, args[3], args[4], schema, count, readingRow)
	case "consume-bytes":
		return consume(client, args[3], args[4], nil, count, bytesRow)
	case "produce-json":
		schema, err := pulsar.NewJSONSchemaWithValidation(readingDef, nil)
		if err != nil {
			return err
		}
		return produce(client, schema, args[3], count)
	case "produce-avro":
		schema, err := pulsar.NewAvroSchemaWithValidation(readingDef, nil)
		if err != nil {
			return err
		}
		return produce(client, schema, args[3], count)
	case "produce-batched":
		count, _ = strconv.Atoi(args[4])
		return produceBatched(client, args[3], count, args[5] == "key-based")
	}
	return fmt.Errorf("unknown mode %s", mode)
}

func quiet() plog.Logger {
	logger := logrus.New()
	logger.SetLevel(logrus.ErrorLevel)
	return plog.NewLoggerWithLogrus(logger)
}

// consume prints a ROW for each of `count` messages from the earliest, read with `schema` (nil: bytes), and acks it.
func consume(client pulsar.Client, topic, subscription string, schema pulsar.Schema, count int,
	row func(pulsar.Message) (map[string]any, error)) error {
	consumer, err := client.Subscribe(pulsar.ConsumerOptions{
		Topic: topic, SubscriptionName: subscription, Schema: schema,
		SubscriptionInitialPosition: pulsar.SubscriptionPositionEarliest,
	})
	if err != nil {
		return err
	}
	defer consumer.Close()
	for i := 0; i < count; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		message, err := consumer.Receive(ctx)
		cancel()
		if err != nil {
			return fmt.Errorf("no message %d of %d within 30 s: %w", i+1, count, err)
		}
		fields, err := row(message)
		if err != nil {
			return err
		}
		fields["key"], fields["properties"] = message.Key(), message.Properties()
		fields["event_time"] = message.EventTime().UnixMilli()
		line, _ := json.Marshal(fields)
		fmt.Println("ROW " + string(line))
		if err := consumer.Ack(message); err != nil {
			return err
		}
	}
	return nil
}

func readingRow(message pulsar.Message) (map[string]any, error) {
	var r Reading
	if err := message.GetSchemaValue(&r); err != nil {
		return nil, err
	}
	note := "null"
	if r.Note != nil {
		note = *r.Note
	}
	return map[string]any{"sensor": r.Sensor, "value": r.Value, "seq": r.Seq, "note": note}, nil
}

func bytesRow(message pulsar.Message) (map[string]any, error) {
	return map[string]any{"payload": string(message.Payload())}, nil
}

func produce(client pulsar.Client, schema pulsar.Schema, topic string, count int) error {
	producer, err := client.CreateProducer(pulsar.ProducerOptions{Topic: topic, Schema: schema})
	if err != nil {
		return err
	}
	defer producer.Close()
	odd := "odd"
	for i := 0; i < count; i++ {
		r := Reading{Sensor: fmt.Sprintf("sensor-%d", i%3), Value: float64(i) * 1.5, Seq: int64(i)}
		if i%2 == 1 {
			r.Note = &odd
		}
		_, err := producer.Send(context.Background(), &pulsar.ProducerMessage{
			Key: r.Sensor, Value: &r, Properties: map[string]string{"origin": "go"},
			EventTime: time.UnixMilli(1_700_000_000_000 + int64(i)),
		})
		if err != nil {
			return err
		}
	}
	fmt.Printf("ROW sent %d\n", count)
	return nil
}

func produceBatched(client pulsar.Client, topic string, count int, keyBased bool) error {
	options := pulsar.ProducerOptions{Topic: topic, BatchingMaxPublishDelay: 50 * time.Millisecond}
	if keyBased {
		options.BatcherBuilderType = pulsar.KeyBasedBatchBuilder
	}
	producer, err := client.CreateProducer(options)
	if err != nil {
		return err
	}
	defer producer.Close()
	failed := make(chan error, count)
	for i := 0; i < count; i++ {
		message := &pulsar.ProducerMessage{Key: fmt.Sprintf("k%d", i%4), Payload: []byte(fmt.Sprintf(`"%d"`, i))}
		producer.SendAsync(context.Background(), message, func(_ pulsar.MessageID, _ *pulsar.ProducerMessage, err error) {
			if err != nil {
				failed <- err
			}
		})
	}
	if err := producer.Flush(); err != nil {
		return err
	}
	select {
	case err := <-failed:
		return err
	default:
	}
	fmt.Printf("ROW sent %d\n", count)
	return nil
}
