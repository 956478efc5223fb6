// Command handoff-bot is a small bot backend in Go: it hands a conversation to a human
// agent through the handoff service, relays the end user's messages and prints everything
// the agent side sends back.
//
// It shows the three calls a bot needs, through the stubs `make stubs` generates:
//
//   - StartHandoff opens the chat in Brevo with who the user is and the history so far;
//   - SendMessage relays each user message, with a client_message_id that makes retries safe;
//   - StreamAgentReplies delivers the agent's replies and the handoff's status. When the
//     stream drops (the service restarted or was redeployed, a proxy cut the connection...)
//     the bot reconnects with the cursor of the last event it handled, and gets exactly the
//     events it missed: none lost, none twice.
//
// The user's side of the conversation is scripted: each time the agent writes, the bot
// relays the next scripted message (the arguments, or two built-in ones). Against the
// service's Brevo sandbox (`make run` without BREVO_API_KEY), the simulated agent answers
// every message and closes the chat when the user says "bye", which ends the handoff.
//
//	go run . -addr localhost:50051 "My parcel arrived damaged." "Thanks, bye!"
//
// Ctrl-C stops the handoff from the bot's side (StopHandoff) before exiting.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	handoffv1 "brevo-handoff/gen/go/handoff/v1"
)

var defaultScript = []string{
	"The box was crushed and the mug inside is broken.",
	"That's all, thanks. Bye!",
}

func main() {
	addr := flag.String("addr", "localhost:50051", "host:port of the handoff service's gRPC server")
	conversation := flag.String("conversation", "", "the bot's conversation id (default: a new random one)")
	callTimeout := flag.Duration("call-timeout", 15*time.Second, "deadline of each unary call")
	flag.Parse()
	script := flag.Args()
	if len(script) == 0 {
		script = defaultScript
	}
	if *conversation == "" {
		*conversation = "go-bot-" + newID()
	}
	log.SetFlags(0)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// grpc.WithInsecure: plaintext, as on a cluster network; use TLS credentials otherwise.
	conn, err := grpc.Dial(*addr, grpc.WithInsecure())
	if err != nil {
		log.Fatalf("dial %s: %v", *addr, err)
	}
	defer conn.Close()

	bot := &bot{
		client:      handoffv1.NewHandoffServiceClient(conn),
		callTimeout: *callTimeout,
		script:      script,
	}
	if err := bot.run(ctx, *conversation); err != nil {
		log.Fatalf("error: %v", err)
	}
}

type bot struct {
	client      handoffv1.HandoffServiceClient
	callTimeout time.Duration
	script      []string // user messages still to relay, one per agent message
	handoffID   string
	cursor      string // cursor of the last event handled: where a new stream resumes
}

func (b *bot) run(ctx context.Context, conversationID string) error {
	started, err := b.startHandoff(ctx, conversationID)
	if err != nil {
		return err
	}
	h := started.GetHandoff()
	b.handoffID = h.GetId()
	fmt.Printf("bot -> StartHandoff: handoff %s, Brevo visitor %s, created %t\n",
		h.GetId(), h.GetVisitorId(), started.GetCreated())

	err = b.followReplies(ctx)
	if ctx.Err() != nil {
		// Interrupted: end the handoff from the bot's side, so the agent knows.
		stopCtx, cancel := context.WithTimeout(context.Background(), b.callTimeout)
		defer cancel()
		res, stopErr := b.client.StopHandoff(stopCtx, &handoffv1.StopHandoffRequest{HandoffId: b.handoffID})
		if stopErr != nil {
			return fmt.Errorf("StopHandoff: %w", stopErr)
		}
		fmt.Printf("bot -> StopHandoff: state %s\n", res.GetHandoff().GetState())
		return nil
	}
	return err
}

func (b *bot) startHandoff(ctx context.Context, conversationID string) (*handoffv1.StartHandoffResponse, error) {
	req := &handoffv1.StartHandoffRequest{
		ConversationId: conversationID, // the idempotency key: a retry finds the same handoff
		User: &handoffv1.User{
			Id:         "u-1042",
			Name:       "Ada L.",
			Email:      "ada@example.org",
			Attributes: map[string]string{"plan": "pro", "order": "1042"},
		},
		Title:       "Damaged order",
		Description: "The customer's order #1042 arrived damaged.",
		History: []*handoffv1.HistoryTurn{
			{Role: handoffv1.Role_ROLE_USER, Text: "my order arrived damaged"},
			{Role: handoffv1.Role_ROLE_BOT, Text: "I'm sorry to hear that. Let me get you a human."},
		},
		Metadata: map[string]string{"channel": "web"},
	}
	var res *handoffv1.StartHandoffResponse
	err := b.retry(ctx, "StartHandoff", func(ctx context.Context) error {
		var err error
		res, err = b.client.StartHandoff(ctx, req)
		return err
	})
	return res, err
}

// followReplies reads the handoff's events until it ends, reconnecting from the last
// cursor whenever the stream drops.
func (b *bot) followReplies(ctx context.Context) error {
	backoff := newBackoff()
	for {
		err := b.streamOnce(ctx, backoff)
		if err == nil {
			return nil // the stream completed: the handoff has ended
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var handlerErr *handlerError
		if errors.As(err, &handlerErr) {
			return handlerErr.err
		}
		switch status.Code(err) {
		case codes.Unavailable, codes.ResourceExhausted, codes.Aborted, codes.DeadlineExceeded,
			codes.Internal:
			// Dropped (restart, redeploy, cut connection, a reader cut off for being slow, a
			// proxy resetting the stream...): resume after the last event handled.
		case codes.OutOfRange:
			// The service no longer holds the events after our cursor (trimmed, or its store
			// was reset): start again from the first event it holds.
			fmt.Printf("stream: cursor %q no longer known; starting over\n", b.cursor)
			b.cursor = ""
		default:
			return fmt.Errorf("StreamAgentReplies: %w", err)
		}
		wait := backoff.next()
		fmt.Printf("stream dropped (%s); resuming after cursor %q in %v\n", status.Code(err), b.cursor, wait)
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	}
}

// handlerError is a failure of the bot's own handling of an event: not worth a reconnect.
type handlerError struct{ err error }

func (e *handlerError) Error() string { return e.err.Error() }

func (b *bot) streamOnce(ctx context.Context, backoff *backoff) error {
	stream, err := b.client.StreamAgentReplies(ctx, &handoffv1.StreamAgentRepliesRequest{
		HandoffId:   b.handoffID,
		AfterCursor: b.cursor,
	})
	if err != nil {
		return err
	}
	for {
		item, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		backoff.reset() // the stream works again
		event := item.GetEvent()
		if event == nil {
			continue // a heartbeat on an idle stream: nothing to do
		}
		if err := b.handle(ctx, event); err != nil {
			return &handlerError{err}
		}
		b.cursor = event.GetCursor() // handled: a reconnect resumes after it
	}
}

func (b *bot) handle(ctx context.Context, event *handoffv1.HandoffEvent) error {
	switch payload := event.GetPayload().(type) {
	case *handoffv1.HandoffEvent_AgentJoined:
		fmt.Printf("stream <- agent joined: %s\n", payload.AgentJoined.GetAgent().GetName())
	case *handoffv1.HandoffEvent_AgentMessage:
		m := payload.AgentMessage
		fmt.Printf("stream <- %s (agent): %s\n", m.GetAgent().GetName(), m.GetText())
		for _, a := range m.GetAttachments() {
			fmt.Printf("          attachment %s: %s\n", a.GetName(), a.GetUrl())
		}
		if len(b.script) > 0 {
			text := b.script[0]
			if err := b.sendMessage(ctx, text); err != nil {
				return err
			}
			b.script = b.script[1:]
		}
	case *handoffv1.HandoffEvent_NoAgentAvailable:
		fmt.Println("stream <- no agent available")
	case *handoffv1.HandoffEvent_HandoffEnded:
		fmt.Printf("stream <- handoff ended: %s\n", payload.HandoffEnded.GetReason())
	default:
		fmt.Printf("stream <- an event this bot does not know (cursor %s)\n", event.GetCursor())
	}
	return nil
}

func (b *bot) sendMessage(ctx context.Context, text string) error {
	req := &handoffv1.SendMessageRequest{
		HandoffId:       b.handoffID,
		ClientMessageId: newID(), // the same id on every retry: the agent sees the message once
		Text:            text,
	}
	return b.retry(ctx, "SendMessage", func(ctx context.Context) error {
		res, err := b.client.SendMessage(ctx, req)
		if err == nil {
			fmt.Printf("bot -> SendMessage: %s (duplicate %t)\n", text, res.GetDuplicate())
		}
		return err
	})
}

// retry calls f until it succeeds, retrying with backoff on the status codes that say
// "retry" (UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, DEADLINE_EXCEEDED).
func (b *bot) retry(ctx context.Context, name string, f func(context.Context) error) error {
	backoff := newBackoff()
	for attempt := 1; ; attempt++ {
		callCtx, cancel := context.WithTimeout(ctx, b.callTimeout)
		err := f(callCtx)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch status.Code(err) {
		case codes.Unavailable, codes.ResourceExhausted, codes.Aborted, codes.DeadlineExceeded:
			if attempt == 8 {
				return fmt.Errorf("%s: %w", name, err)
			}
			wait := backoff.next()
			fmt.Printf("%s failed (%s); retrying in %v\n", name, status.Code(err), wait)
			if err := sleep(ctx, wait); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: %w", name, err)
		}
	}
}

type backoff struct{ delay time.Duration }

func newBackoff() *backoff { return &backoff{} }

func (b *backoff) next() time.Duration {
	switch {
	case b.delay == 0:
		b.delay = 200 * time.Millisecond
	case b.delay < 5*time.Second:
		b.delay *= 2
	}
	return b.delay
}

func (b *backoff) reset() { b.delay = 0 }

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func newID() string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}
