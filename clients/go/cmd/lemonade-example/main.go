// Command lemonade-example loads a model with progress, follows the pool's
// events, and streams a completion:
//
//	go run ./cmd/lemonade-example -address 127.0.0.1:50051 -model tiny -prompt "Once upon a time"
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
	"github.com/lemonade-grpc/lemonade-grpc/clients/go/lemonade"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

func main() {
	address := flag.String("address", "127.0.0.1:50051", "server address")
	model := flag.String("model", "tiny", "model to load")
	prompt := flag.String("prompt", "Once upon a time", "prompt to complete")
	flag.Parse()
	if err := run(*address, *model, *prompt); err != nil {
		if details, ok := lemonade.Details(err); ok {
			log.Fatalf("%s %s: %s", details.Code, details.Reason, details.Message)
		}
		log.Fatal(err)
	}
}

func run(address, model, prompt string) error {
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	control := lemonadev1.NewModelControlClient(conn)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Follow the pool in the background: loads, evictions, pins, crashes.
	go func() {
		_ = lemonade.Watch(ctx, control, nil, func(event *lemonadev1.WatchResponse) error {
			fmt.Fprintf(os.Stderr, "event %d: %T\n", event.GetSequence(), event.GetEvent())
			return nil
		})
	}()

	load, err := control.Load(ctx, &lemonadev1.LoadRequest{Model: model})
	if err != nil {
		return err
	}
	for {
		progress, err := load.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		fmt.Printf("%s %s\n", progress.GetPhase(), progress.GetMessage())
	}

	inference := lemonadev1.NewInferenceClient(conn)
	completion, err := inference.Complete(ctx, &lemonadev1.CompleteRequest{
		Model: model, Prompt: prompt, MaxTokens: proto.Uint32(32),
	})
	if err != nil {
		return err
	}
	for {
		reply, err := completion.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		fmt.Print(reply.GetText())
	}
	fmt.Println()
	time.Sleep(100 * time.Millisecond) // let the last events print
	return nil
}
