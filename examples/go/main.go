// A business write and its outbox events in one transaction, with database/sql and lib/pq.
//
//	cd examples/go && go run .
//
// Without the Go module proxy (as on the project's machines), with Debian's
// golang-github-lib-pq-dev:
//
//	cd examples/go && GO111MODULE=off GOPATH=/usr/share/gocode go run .
//
// Settings come from the environment: DATABASE_URL, OUTBOX_SCHEMA and OUTBOX_TABLE (default
// outbox.outbox), EXAMPLE_TOPIC_PREFIX (default shop), EXAMPLE_RUN_ID (default a random id;
// every event carries it, so a test can find exactly this run's events) and TRACEPARENT.
//
// The events, the same in every example: OrderPlaced (JSON, through the enqueue function),
// three OrderLineAdded (JSON, one INSERT for the batch), OrderPaid (protobuf bytes).
package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log"
	"os"

	"github.com/lib/pq"
)

// The protobuf encoding of OrderPaid {currency: "EUR", amount_cents: 9950, refunded: false}.
// bytea takes any bytes, NUL included.
var orderPaidProto = []byte{0x0a, 0x03, 'E', 'U', 'R', 0x10, 0xde, 0x4d, 0x18, 0x00}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		log.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// currentTraceparent is the W3C traceparent of the writer's current span. No tracer is
// installed here, so it comes from TRACEPARENT, else a made-up valid one. With OpenTelemetry it
// is the context's span:
//
//	carrier := propagation.MapCarrier{}
//	otel.GetTextMapPropagator().Inject(ctx, carrier)
//	carrier.Get("traceparent")
func currentTraceparent() string {
	return env("TRACEPARENT", "00-"+randomHex(16)+"-"+randomHex(8)+"-01")
}

// lineEvent is one event of the batch.
type lineEvent struct {
	topic, eventType, contentType string
	payload                       []byte
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		log.Fatal(err)
	}
	return b
}

func main() {
	ctx := context.Background()
	schema := env("OUTBOX_SCHEMA", "outbox")
	tableName := env("OUTBOX_TABLE", "outbox")
	prefix := env("EXAMPLE_TOPIC_PREFIX", "shop")
	runID := env("EXAMPLE_RUN_ID", randomHex(8))
	traceparent := currentTraceparent()
	orderID := "order-" + runID
	headers := mustJSON(map[string]string{"run-id": runID, "tenant": "acme"})

	table := pq.QuoteIdentifier(schema) + "." + pq.QuoteIdentifier(tableName)
	enqueue := pq.QuoteIdentifier(schema) + "." + pq.QuoteIdentifier(tableName+"_enqueue")
	orders := pq.QuoteIdentifier(schema) + ".example_orders"

	db, err := sql.Open("postgres", env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"))
	if err != nil {
		log.Fatal(err)
	}
	defer db.Close()

	// The business table; a real service has its own.
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+orders+` (id text PRIMARY KEY,
		run_id text NOT NULL, status text NOT NULL, total numeric NOT NULL,
		updated_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		log.Fatal(err)
	}

	placedID, err := placeAndPay(ctx, db, table, enqueue, orders, prefix, orderID, runID, traceparent, headers)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("run %s: order %s and 5 events committed (first event %s)\n", runID, orderID, placedID)
}

// placeAndPay writes the order and its events in one transaction: the relay sees the events
// only once the order is written, and a failure leaves neither.
func placeAndPay(ctx context.Context, db *sql.DB, table, enqueue, orders, prefix, orderID, runID, traceparent string, headers []byte) (string, error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return "", err
	}
	// A no-op once committed.
	defer tx.Rollback()

	if _, err := tx.ExecContext(ctx, `INSERT INTO `+orders+` (id, run_id, status, total)
		VALUES ($1, $2, 'placed', 99.5)`, orderID, runID); err != nil {
		return "", fmt.Errorf("insert the order: %w", err)
	}

	// One JSON event in one call; the function returns the event id. lib/pq sends []byte as
	// bytea, so JSON goes as a string and is cast.
	var placedID string
	placed := mustJSON(map[string]any{"order_id": orderID, "total": 99.5})
	if err := tx.QueryRowContext(ctx, `SELECT `+enqueue+`($1, $2, 'OrderPlaced', $3::jsonb,
		aggregate_type => 'Order', headers => $4::jsonb, traceparent => $5, correlation_id => $6)`,
		prefix+".orders.placed", orderID, string(placed), string(headers), traceparent, runID,
	).Scan(&placedID); err != nil {
		return "", fmt.Errorf("enqueue OrderPlaced: %w", err)
	}

	// A batch in one statement: arrays unnested in order, so the events get ids (their
	// publishing order) in the order given.
	var lines []lineEvent
	for n := 1; n <= 3; n++ {
		lines = append(lines, lineEvent{
			topic:       prefix + ".orders.line_added",
			eventType:   "OrderLineAdded",
			contentType: "application/json",
			payload:     mustJSON(map[string]any{"order_id": orderID, "line": n, "sku": fmt.Sprintf("sku-%d", n), "qty": n}),
		})
	}
	if err := insertEvents(ctx, tx, table, orderID, runID, traceparent, headers, lines); err != nil {
		return "", fmt.Errorf("insert the lines: %w", err)
	}

	if _, err := tx.ExecContext(ctx, `UPDATE `+orders+` SET status = 'paid', updated_at = now()
		WHERE id = $1`, orderID); err != nil {
		return "", fmt.Errorf("pay the order: %w", err)
	}
	paid := []lineEvent{{
		topic:       prefix + ".orders.paid",
		eventType:   "OrderPaid",
		contentType: "application/x-protobuf",
		payload:     orderPaidProto,
	}}
	if err := insertEvents(ctx, tx, table, orderID, runID, traceparent, headers, paid); err != nil {
		return "", fmt.Errorf("insert OrderPaid: %w", err)
	}
	return placedID, tx.Commit()
}

func insertEvents(ctx context.Context, tx *sql.Tx, table, orderID, runID, traceparent string, headers []byte, events []lineEvent) error {
	var topics, types, contentTypes []string
	var payloads [][]byte
	for _, e := range events {
		topics = append(topics, e.topic)
		types = append(types, e.eventType)
		contentTypes = append(contentTypes, e.contentType)
		payloads = append(payloads, e.payload)
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO `+table+` (event_id, topic, aggregate_id,
		aggregate_type, event_type, payload, headers, content_type, traceparent, correlation_id)
		SELECT gen_random_uuid(), t, $5, 'Order', et, p, $6::jsonb, ct, $7, $8
		FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[]) WITH ORDINALITY AS u(t, et, p, ct, n)
		ORDER BY n`,
		pq.Array(topics), pq.Array(types), pq.Array(payloads), pq.Array(contentTypes),
		orderID, string(headers), traceparent, runID)
	return err
}
