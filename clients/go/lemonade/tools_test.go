package lemonade

import (
	"testing"

	lemonadev1 "github.com/lemonade-grpc/lemonade-grpc/clients/go/gen/lemonade/v1"
)

func TestToolCallsAssembleInterleavedPiecesByIndex(t *testing.T) {
	var calls ToolCalls
	// Two calls whose pieces interleave, arriving in several messages, the second call first.
	calls.Add(&lemonadev1.ToolCallDelta{Index: 1, Id: "call_1", Name: "get_time", Arguments: `{"zone"`})
	calls.Add(
		&lemonadev1.ToolCallDelta{Index: 0, Id: "call_0", Name: "get_weather", Arguments: `{"ci`},
		&lemonadev1.ToolCallDelta{Index: 1, Arguments: `: "UTC"}`},
	)
	calls.Add(&lemonadev1.ToolCallDelta{Index: 0, Arguments: `ty": "Zürich"}`})
	got := calls.Calls()
	want := [][3]string{{"call_0", "get_weather", `{"city": "Zürich"}`}, {"call_1", "get_time", `{"zone": "UTC"}`}}
	if len(got) != len(want) {
		t.Fatalf("got %d calls, want %d: %v", len(got), len(want), got)
	}
	for i, call := range got {
		if [3]string{call.GetId(), call.GetName(), call.GetArguments()} != want[i] {
			t.Errorf("call %d: got %v, want %v", i, call, want[i])
		}
	}
	var none ToolCalls
	if len(none.Calls()) != 0 {
		t.Errorf("no deltas: got calls %v", none.Calls())
	}
}
