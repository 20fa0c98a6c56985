// Command lemonade-agent runs a tool call, its result and an answer on
// lemonade-grpc's default model (`make run`). It offers the model a
// get_weather tool; a model whose chat template takes tools calls it
// (streamed deltas, assembled by lemonade.ToolCalls), and SmolLM2's takes
// none, so the server refuses the tools (CAPABILITY_MISSING) and the agent
// asks for the call as JSON under a schema instead, which the grammar
// guarantees. Either way it runs the tool and hands the result back.
//
//	go run ./cmd/lemonade-agent -address 127.0.0.1:50051 "What is the weather like in Lisbon?"
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"strings"
	"time"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
	"github.com/lemonade-grpc/lemonade-grpc/clients/go/lemonade"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

var weather = map[string]string{"lisbon": "22 °C and sunny", "paris": "14 °C and cloudy", "london": "11 °C and raining"}

var parameters = map[string]any{
	"type":       "object",
	"properties": map[string]any{"city": map[string]any{"type": "string", "enum": []any{"Lisbon", "Paris", "London"}}},
	"required":   []any{"city"},
}

func main() {
	address := flag.String("address", "127.0.0.1:50051", "server address")
	flag.Parse()
	question := "What is the weather like in Lisbon?"
	if flag.NArg() > 0 {
		question = flag.Arg(0)
	}
	if err := run(*address, question); err != nil {
		if details, ok := lemonade.Details(err); ok {
			log.Fatalf("%s %s: %s", details.Code, details.Reason, details.Message)
		}
		log.Fatal(err)
	}
}

// chat streams a reply to request: its text and its tool calls, assembled.
func chat(ctx context.Context, inference lemonadev1.InferenceClient, request *lemonadev1.ChatRequest) (string, []*lemonadev1.ToolCall, error) {
	stream, err := inference.Chat(ctx, request)
	if err != nil {
		return "", nil, err
	}
	var text strings.Builder
	var calls lemonade.ToolCalls
	for {
		reply, err := stream.Recv()
		if err == io.EOF {
			return text.String(), calls.Calls(), nil
		}
		if err != nil {
			return "", nil, err
		}
		text.WriteString(reply.GetText())
		calls.Add(reply.GetToolCalls()...)
	}
}

func run(address, question string) error {
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	inference := lemonadev1.NewInferenceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	schema, err := structpb.NewStruct(parameters)
	if err != nil {
		return err
	}
	tool := &lemonadev1.Tool{Name: "get_weather", Description: "The current weather in a city", Parameters: schema}
	user := &lemonadev1.ChatMessage{Role: "user", Content: question}
	_, calls, err := chat(ctx, inference, &lemonadev1.ChatRequest{
		Model:      "smollm2",
		Messages:   []*lemonadev1.ChatMessage{user},
		Tools:      []*lemonadev1.Tool{tool},
		ToolChoice: &lemonadev1.ToolChoice{Choice: &lemonadev1.ToolChoice_Mode{Mode: lemonadev1.ToolChoiceMode_TOOL_CHOICE_MODE_REQUIRED}},
	})
	how, callID := "tools", ""
	var arguments struct {
		City string `json:"city"`
	}
	switch {
	case err == nil && len(calls) > 0:
		callID = calls[0].GetId()
		if err := json.Unmarshal([]byte(calls[0].GetArguments()), &arguments); err != nil {
			return err
		}
	case lemonade.Reason(err) == "CAPABILITY_MISSING":
		how = "json-schema"
		callSchema, err := structpb.NewStruct(map[string]any{
			"type":                 "object",
			"properties":           map[string]any{"tool": map[string]any{"enum": []any{"get_weather"}}, "arguments": parameters},
			"required":             []any{"tool", "arguments"},
			"additionalProperties": false,
		})
		if err != nil {
			return err
		}
		text, _, err := chat(ctx, inference, &lemonadev1.ChatRequest{
			Model:       "smollm2",
			Temperature: proto.Float32(0),
			MaxTokens:   proto.Uint32(64),
			Messages: []*lemonadev1.ChatMessage{
				{Role: "system", Content: "Choose the tool call that answers the user, as JSON."}, user,
			},
			ResponseFormat: &lemonadev1.ResponseFormat{Format: &lemonadev1.ResponseFormat_JsonSchema{
				JsonSchema: &lemonadev1.JsonSchemaFormat{Schema: callSchema},
			}},
		})
		if err != nil {
			return err
		}
		var call struct {
			Arguments json.RawMessage `json:"arguments"`
		}
		if err := json.Unmarshal([]byte(text), &call); err != nil {
			return err
		}
		if err := json.Unmarshal(call.Arguments, &arguments); err != nil {
			return err
		}
	default:
		return fmt.Errorf("the model made no tool call: %w", err)
	}
	result, ok := weather[strings.ToLower(arguments.City)]
	if !ok {
		result = "unknown"
	}
	encoded, _ := json.Marshal(arguments)
	fmt.Printf("question: %s\ntool call (%s): get_weather(%s)\ntool result: %s\n", question, how, encoded, result)

	messages := []*lemonadev1.ChatMessage{
		{Role: "system", Content: "You are a helpful assistant."},
		{Role: "user", Content: fmt.Sprintf("Tool result: the weather in %s is %s. Question: %s", arguments.City, result, question)},
	}
	if callID != "" { // the model called the tool: its call, then the tool's answer to it
		messages = []*lemonadev1.ChatMessage{
			user,
			{Role: "assistant", ToolCalls: calls[:1]},
			{Role: "tool", ToolCallId: callID, Content: result},
		}
	}
	answer, _, err := chat(ctx, inference, &lemonadev1.ChatRequest{
		Model: "smollm2", Temperature: proto.Float32(0), MaxTokens: proto.Uint32(48), Messages: messages,
	})
	if err != nil {
		return err
	}
	fmt.Printf("answer: %s\n", strings.Join(strings.Fields(answer), " ")) // one line, whatever the model wrote
	return nil
}
