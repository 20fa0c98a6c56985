// Command lemonade-firsttoken measures, with Go clients, the time to the first
// token and of a 1-token request through lemonade-grpc (gRPC) and through
// OpenAI-compatible HTTP endpoints (llama-swap, llama-server itself), in
// rounds that rotate the order of the paths. bench/peers.py runs it against
// the servers it started, to show what the control planes cost when the
// client is not Python:
//
//	go run ./cmd/lemonade-firsttoken -grpc 127.0.0.1:50051 -model tiny \
//	    -http direct=http://127.0.0.1:8080/v1/completions -rounds 20
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

const prompt = "Once upon a time"

type endpoints []string

func (e *endpoints) String() string     { return strings.Join(*e, ",") }
func (e *endpoints) Set(v string) error { *e = append(*e, v); return nil }

// path is one way to ask for a completion; it returns the time to the first
// text and to the end of the response.
type path struct {
	name string
	run  func(ctx context.Context, tokens int) (first, total time.Duration, err error)
}

func main() {
	address := flag.String("grpc", "", "lemonade-grpc address")
	model := flag.String("model", "tiny", "model name on every path")
	rounds := flag.Int("rounds", 20, "rounds (each runs every path)")
	tokens := flag.Int("tokens", 16, "tokens of the time-to-first-token request")
	var urls, closing endpoints
	flag.Var(&urls, "http", "NAME=URL of an OpenAI-compatible /v1/completions (repeatable)")
	flag.Var(&closing, "close", "NAME of an -http path that closes its connection after a stream (llama-server does)")
	flag.Parse()
	conn, err := grpc.NewClient(*address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	paths := []path{{"lemonade-grpc", grpcPath(lemonadev1.NewInferenceClient(conn), *model)}}
	// One client per path, as a program talking to one server has; it keeps
	// connections alive unless the server closes them after each stream.
	for _, spec := range urls {
		name, url, _ := strings.Cut(spec, "=")
		transport := http.DefaultTransport.(*http.Transport).Clone()
		transport.DisableKeepAlives = strings.Contains(","+closing.String()+",", ","+name+",")
		paths = append(paths, path{name, httpPath(&http.Client{Transport: transport}, url, *model)})
	}
	ctx := context.Background()
	first := map[string][]time.Duration{}
	oneToken := map[string][]time.Duration{}
	for round := -2; round < *rounds; round++ { // two rounds to warm up
		for i := range paths {
			p := paths[(i+max(round, 0))%len(paths)]
			f, _, err := p.run(ctx, *tokens)
			if err != nil {
				log.Fatalf("%s: %v", p.name, err)
			}
			_, t, err := p.run(ctx, 1)
			if err != nil {
				log.Fatalf("%s: %v", p.name, err)
			}
			if round >= 0 {
				first[p.name] = append(first[p.name], f)
				oneToken[p.name] = append(oneToken[p.name], t)
			}
		}
	}
	fmt.Printf("Go clients (grpc-go, net/http), %d rounds, medians:\n\n", *rounds)
	fmt.Println("| path | time to first token | 1-token request |")
	fmt.Println("|---|---:|---:|")
	for _, p := range paths {
		fmt.Printf("| %s | %.2f ms | %.2f ms |\n", p.name, median(first[p.name]), median(oneToken[p.name]))
	}
}

func grpcPath(client lemonadev1.InferenceClient, model string) func(context.Context, int) (time.Duration, time.Duration, error) {
	return func(ctx context.Context, tokens int) (time.Duration, time.Duration, error) {
		request := &lemonadev1.CompleteRequest{
			Model: model, Prompt: prompt, MaxTokens: proto.Uint32(uint32(tokens)),
			Temperature: proto.Float32(0), Seed: proto.Uint32(1234), IgnoreEos: true,
		}
		started := time.Now()
		var first time.Duration
		stream, err := client.Complete(ctx, request)
		if err != nil {
			return 0, 0, err
		}
		for {
			reply, err := stream.Recv()
			if err == io.EOF {
				return first, time.Since(started), nil
			}
			if err != nil {
				return 0, 0, err
			}
			if first == 0 && reply.GetText() != "" {
				first = time.Since(started)
			}
		}
	}
}

func httpPath(client *http.Client, url, model string) func(context.Context, int) (time.Duration, time.Duration, error) {
	return func(ctx context.Context, tokens int) (time.Duration, time.Duration, error) {
		body, _ := json.Marshal(map[string]any{
			"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
			"seed": 1234, "ignore_eos": true, "stream": true,
		})
		started := time.Now()
		var first time.Duration
		request, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
		if err != nil {
			return 0, 0, err
		}
		request.Header.Set("Content-Type", "application/json")
		response, err := client.Do(request)
		if err != nil {
			return 0, 0, err
		}
		defer response.Body.Close()
		if response.StatusCode != http.StatusOK {
			return 0, 0, fmt.Errorf("status %d", response.StatusCode)
		}
		lines := bufio.NewScanner(response.Body)
		for lines.Scan() {
			line := lines.Bytes()
			if !bytes.HasPrefix(line, []byte("data: ")) || bytes.Equal(line, []byte("data: [DONE]")) {
				continue
			}
			var event struct {
				Choices []struct{ Text string } `json:"choices"`
			}
			if err := json.Unmarshal(line[6:], &event); err != nil {
				return 0, 0, err
			}
			if first == 0 && len(event.Choices) > 0 && event.Choices[0].Text != "" {
				first = time.Since(started)
			}
		}
		return first, time.Since(started), lines.Err()
	}
}

func median(values []time.Duration) float64 {
	if len(values) == 0 {
		fmt.Fprintln(os.Stderr, "no values")
		return 0
	}
	sorted := append([]time.Duration(nil), values...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	return float64(sorted[len(sorted)/2].Microseconds()) / 1000
}
