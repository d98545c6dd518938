-- Argo CD health check for portcullis.dev/AIPipeline (Lua 5.1, as Argo CD runs it).
--
-- Healthy:     the status describes the current generation and Ready is True. Denied items
--              (GuardrailsSatisfied False) are the guardrails working, not a failure: the
--              message says how many were denied.
-- Degraded:    Degraded is True, or Ready is False for a reason that needs a person
--              (InvalidSpec, AdoptionRefused).
-- Progressing: no status yet, a status for an older generation, no conditions yet, or Ready
--              not (yet) True for another reason; the message says which.
hs = {}

local function find_condition(conditions, condition_type)
  if type(conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(conditions) do
    if type(c) == "table" and c.type == condition_type then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c == nil then
    return ""
  end
  local text = ""
  if c.reason ~= nil and c.reason ~= "" then
    text = tostring(c.reason)
  end
  if c.message ~= nil and c.message ~= "" then
    if text ~= "" then
      text = text .. ": "
    end
    text = text .. tostring(c.message)
  end
  return text
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Portcullis operator: the pipeline has no status yet"
  return hs
end

local observed = obj.status.observedGeneration
if observed == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Portcullis operator: the status has no observedGeneration yet"
  return hs
end
if generation ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Portcullis operator to reconcile generation " .. tostring(generation)
    .. " (the status describes generation " .. tostring(observed) .. ")"
  return hs
end

local conditions = obj.status.conditions
local ready = find_condition(conditions, "Ready")
local degraded = find_condition(conditions, "Degraded")
local guardrails = find_condition(conditions, "GuardrailsSatisfied")

if ready == nil and degraded == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Portcullis operator: the status has no Ready or Degraded condition yet"
  return hs
end

if ready ~= nil and ready.observedGeneration ~= nil and generation ~= nil
    and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the Portcullis operator: the Ready condition describes generation "
    .. tostring(ready.observedGeneration) .. ", the pipeline is at generation " .. tostring(generation)
  return hs
end

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  -- The Degraded condition may only point at Ready ("see the Ready condition"); Ready says what
  -- is wrong and what to do.
  if ready ~= nil and ready.status == "False" and describe(ready) ~= "" then
    hs.message = describe(ready)
  elseif describe(degraded) ~= "" then
    hs.message = describe(degraded)
  else
    hs.message = "The Portcullis operator reports the pipeline Degraded"
  end
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  local message = describe(ready)
  if message == "" then
    message = "Every stage has its identity, RBAC and network policy"
  end
  if guardrails ~= nil and guardrails.status == "False" and describe(guardrails) ~= "" then
    message = message .. "; " .. describe(guardrails)
  end
  hs.message = message
  return hs
end

if ready ~= nil and ready.status == "False"
    and (ready.reason == "InvalidSpec" or ready.reason == "AdoptionRefused") then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = "Waiting for Ready: Ready is " .. tostring(ready.status)
  if describe(ready) ~= "" then
    hs.message = hs.message .. " (" .. describe(ready) .. ")"
  end
else
  hs.message = "Waiting for the Portcullis operator: the status has no Ready condition yet"
end
return hs
