package lemonade

import (
	"context"
	"errors"
	"io"
	"time"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Reconnection waits of Watch: doubling from the first up to the second,
// back to the first once a message arrives.
var (
	ReconnectMin = 100 * time.Millisecond
	ReconnectMax = 2 * time.Second
)

// Watch follows the pool's events, across disconnections and server
// restarts, calling handle with each message until ctx ends or handle
// returns an error (which Watch returns).
//
// With since nil it starts with a snapshot; otherwise with the events after
// *since. When the stream breaks (UNAVAILABLE: the server stopped,
// restarted, or the connection dropped) it reconnects with the last
// sequence it saw: the server replays what was missed or, when it cannot
// (another run of the server, or too far behind), sends a snapshot with
// Resync set first. No message is handled twice. Any other error is
// returned.
func Watch(
	ctx context.Context,
	client lemonadev1.ModelControlClient,
	since *uint64,
	handle func(*lemonadev1.WatchResponse) error,
) error {
	var last *uint64
	if since != nil {
		value := *since
		last = &value
	}
	wait := ReconnectMin
	for {
		request := &lemonadev1.WatchRequest{}
		if last != nil {
			request.SinceSequence = last
		}
		err := follow(ctx, client, request, func(message *lemonadev1.WatchResponse) error {
			wait = ReconnectMin
			_, snapshot := message.GetEvent().(*lemonadev1.WatchResponse_Snapshot)
			if !snapshot && last != nil && message.GetSequence() <= *last {
				return nil // seen before the reconnection
			}
			sequence := message.GetSequence()
			last = &sequence
			return handle(message)
		})
		var fromHandler handlerError
		if errors.As(err, &fromHandler) {
			return fromHandler.err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil && status.Code(err) != codes.Unavailable {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(wait*2, ReconnectMax)
	}
}

// handlerError marks an error of the caller's handler, returned as is.
type handlerError struct{ err error }

func (e handlerError) Error() string { return e.err.Error() }

func follow(
	ctx context.Context,
	client lemonadev1.ModelControlClient,
	request *lemonadev1.WatchRequest,
	handle func(*lemonadev1.WatchResponse) error,
) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Watch(ctx, request)
	if err != nil {
		return err
	}
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return status.Error(codes.Unavailable, "the Watch stream ended")
		}
		if err != nil {
			return err
		}
		if err := handle(message); err != nil {
			return handlerError{err}
		}
	}
}
